"""Named choices of the params that the library resolves, kept apart from the code that uses them so that the
configuration (transfgu/config.py) can read them without importing that code."""

BACKENDS = ("auto", "faiss", "torch")   # cluster.backend (transfgu/cluster.py)
PRECISIONS = ("auto", "fp32", "bf16")    # <stage>.precision (transfgu/precision.py)
DECODES = ("host", "device")           # extract / pseudo / train .decode (transfgu/data/dataset.py)
LAUNCHERS = ("auto", "local", "slurm")  # launcher.backend (transfgu/launch.py)
PROTOCOLS = ("transfgu", "stego")   # evaluate.protocol: how val images are resized and cropped (transfgu/data/images.py)
