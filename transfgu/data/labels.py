"""Class lists and raw-label -> class maps of every dataset (docs/method.md, "Datasets and granularities").

A map is a lookup table over raw label values (uint16 range): a class id, IGNORE (left out of the
confusion matrix), or INVALID (a value the dataset never uses: reading it is an error)."""
from __future__ import annotations

import numpy as np

IGNORE = 255
INVALID = -1
LUT_SIZE = 65536


def lut_from(mapping: dict[int, int], ignore=(255,)) -> np.ndarray:
    lut = np.full(LUT_SIZE, INVALID, dtype=np.int16)
    for raw in ignore:
        lut[raw] = IGNORE
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


# -- COCO-Stuff: PNG ids are category_id - 1 (0..181), 255 = unlabelled -----------------------------------
COCO_UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THING_IDS = [i for i in range(91) if i not in COCO_UNUSED_THING_IDS]  # 80
COCO_STUFF_IDS = list(range(91, 182))                                      # 91

COCO_NAMES = {
    0: "person", 1: "bicycle", 2: "car", 3: "motorcycle", 4: "airplane", 5: "bus", 6: "train", 7: "truck",
    8: "boat", 9: "traffic light", 10: "fire hydrant", 12: "stop sign", 13: "parking meter", 14: "bench",
    15: "bird", 16: "cat", 17: "dog", 18: "horse", 19: "sheep", 20: "cow", 21: "elephant", 22: "bear",
    23: "zebra", 24: "giraffe", 26: "backpack", 27: "umbrella", 30: "handbag", 31: "tie", 32: "suitcase",
    33: "frisbee", 34: "skis", 35: "snowboard", 36: "sports ball", 37: "kite", 38: "baseball bat",
    39: "baseball glove", 40: "skateboard", 41: "surfboard", 42: "tennis racket", 43: "bottle",
    45: "wine glass", 46: "cup", 47: "fork", 48: "knife", 49: "spoon", 50: "bowl", 51: "banana", 52: "apple",
    53: "sandwich", 54: "orange", 55: "broccoli", 56: "carrot", 57: "hot dog", 58: "pizza", 59: "donut",
    60: "cake", 61: "chair", 62: "couch", 63: "potted plant", 64: "bed", 66: "dining table", 69: "toilet",
    71: "tv", 72: "laptop", 73: "mouse", 74: "remote", 75: "keyboard", 76: "cell phone", 77: "microwave",
    78: "oven", 79: "toaster", 80: "sink", 81: "refrigerator", 83: "book", 84: "clock", 85: "vase",
    86: "scissors", 87: "teddy bear", 88: "hair drier", 89: "toothbrush",
    91: "banner", 92: "blanket", 93: "branch", 94: "bridge", 95: "building-other", 96: "bush", 97: "cabinet",
    98: "cage", 99: "cardboard", 100: "carpet", 101: "ceiling-other", 102: "ceiling-tile", 103: "cloth",
    104: "clothes", 105: "clouds", 106: "counter", 107: "cupboard", 108: "curtain", 109: "desk-stuff",
    110: "dirt", 111: "door-stuff", 112: "fence", 113: "floor-marble", 114: "floor-other", 115: "floor-stone",
    116: "floor-tile", 117: "floor-wood", 118: "flower", 119: "fog", 120: "food-other", 121: "fruit",
    122: "furniture-other", 123: "grass", 124: "gravel", 125: "ground-other", 126: "hill", 127: "house",
    128: "leaves", 129: "light", 130: "mat", 131: "metal", 132: "mirror-stuff", 133: "moss", 134: "mountain",
    135: "mud", 136: "napkin", 137: "net", 138: "paper", 139: "pavement", 140: "pillow", 141: "plant-other",
    142: "plastic", 143: "platform", 144: "playingfield", 145: "railing", 146: "railroad", 147: "river",
    148: "road", 149: "rock", 150: "roof", 151: "rug", 152: "salad", 153: "sand", 154: "sea", 155: "shelf",
    156: "sky-other", 157: "skyscraper", 158: "snow", 159: "solid-other", 160: "stairs", 161: "stone",
    162: "straw", 163: "structural-other", 164: "table", 165: "tent", 166: "textile-other", 167: "towel",
    168: "tree", 169: "vegetable", 170: "wall-brick", 171: "wall-concrete", 172: "wall-other",
    173: "wall-panel", 174: "wall-stone", 175: "wall-tile", 176: "wall-wood", 177: "water-drops",
    178: "waterdrops", 179: "window-blind", 180: "window-other", 181: "wood",
}


def _ranges(*spans):
    out = []
    for s in spans:
        out += list(range(s[0], s[1] + 1)) if isinstance(s, tuple) else [s]
    return out


COCO27_GROUPS = [  # (name, member PNG ids), things first, in the original class order
    ("electronic", _ranges((71, 76))), ("appliance", _ranges((77, 82))), ("food", _ranges((51, 60))),
    ("furniture", _ranges((61, 70))), ("indoor", _ranges((83, 90))), ("kitchen", _ranges((43, 50))),
    ("accessory", _ranges((25, 32))), ("animal", _ranges((15, 24))), ("outdoor", _ranges((9, 14))),
    ("person", [0]), ("sports", _ranges((33, 42))), ("vehicle", _ranges((1, 8))),
    ("ceiling", [101, 102]), ("floor", _ranges(100, (113, 117))), ("food-stuff", [120, 121, 152, 169]),
    ("furniture-stuff", [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164]),
    ("raw-material", [99, 131, 138, 142]), ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]),
    ("wall", _ranges((170, 176))), ("window", [179, 180]), ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]), ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]), ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
]


def coco_stuff_27():
    mapping = {raw: c for c, (_, members) in enumerate(COCO27_GROUPS) for raw in members}
    return [n for n, _ in COCO27_GROUPS], lut_from(mapping, ignore=(255,))


def coco_stuff_171():
    ids = COCO_THING_IDS + COCO_STUFF_IDS
    return [COCO_NAMES[i] for i in ids], lut_from({raw: c for c, raw in enumerate(ids)},
                                                  ignore=(255, *COCO_UNUSED_THING_IDS))


def coco_80():
    mapping = {raw: c + 1 for c, raw in enumerate(COCO_THING_IDS)}
    mapping.update({raw: 0 for raw in COCO_STUFF_IDS})
    return ["background"] + [COCO_NAMES[i] for i in COCO_THING_IDS], lut_from(
        mapping, ignore=(255, *COCO_UNUSED_THING_IDS))


# -- Cityscapes: gtFine labelIds 7..33 -> 0..26, lower ids ignored --------------------------------------------
CITYSCAPES_NAMES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]


def cityscapes_27():
    return list(CITYSCAPES_NAMES), lut_from({raw: raw - 7 for raw in range(7, 34)}, ignore=(*range(7), 255))


# -- Pascal VOC 2012: SegmentationClass indices, 255 ignored ------------------------------------------------
VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]


def voc_21():
    return list(VOC_NAMES), lut_from({i: i for i in range(21)}, ignore=(255,))


# -- LIP: 20 raw parsing ids ----------------------------------------------------------------------------
LIP_NAMES = ["background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks",
             "pants", "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg",
             "left-shoe", "right-shoe"]
LIP5_GROUPS = [("head", [1, 2, 4, 13]), ("upper/torso clothes", [5, 6, 7, 10, 11, 12]), ("arms", [3, 14, 15]),
               ("legs", [9, 16, 17]), ("feet", [8, 18, 19])]


def lip(granularity: int):
    if granularity == 19:
        return list(LIP_NAMES), lut_from({i: i for i in range(20)})
    if granularity == 16:
        mapping = {i: i for i in range(14)}
        mapping.update({14: 14, 15: 14, 16: 15, 17: 15, 18: 16, 19: 16})
        return LIP_NAMES[:14] + ["arm", "leg", "shoe"], lut_from(mapping)
    if granularity == 5:
        mapping = {0: 0}
        mapping.update({raw: c + 1 for c, (_, members) in enumerate(LIP5_GROUPS) for raw in members})
        return ["background"] + [n for n, _ in LIP5_GROUPS], lut_from(mapping)
    raise ValueError(granularity)


# -- Potsdam (IIC's preparation, as STEGO and HP distribute it): gt values 0..5 --------------------------------
# 0 roads (impervious surfaces), 1 buildings, 2 low vegetation, 3 trees, 4 cars, 5 clutter. The 6-class task puts
# the one thing class (car) first, as the decoder's thing channels come first; the 3-class task merges them as
# STEGO's `Potsdam.fine_to_coarse` does (roads and cars, buildings and clutter, vegetation and trees).
POTSDAM_NAMES = ["roads", "buildings", "low vegetation", "trees", "cars", "clutter"]
POTSDAM6_ORDER = [4, 0, 1, 2, 3, 5]  # raw value of each class, things first
POTSDAM3_GROUPS = [("roads and cars", [0, 4]), ("buildings and clutter", [1, 5]), ("vegetation and trees", [2, 3])]


def potsdam_6():
    return [POTSDAM_NAMES[raw] for raw in POTSDAM6_ORDER], lut_from({raw: c for c, raw in enumerate(POTSDAM6_ORDER)})


def potsdam_3():
    mapping = {raw: c for c, (_, members) in enumerate(POTSDAM3_GROUPS) for raw in members}
    return [n for n, _ in POTSDAM3_GROUPS], lut_from(mapping)
