"""Kept for old commands: `python stages/pretrain.py ...` is `transfgu pretrain ...` (transfgu/pretrain.py)."""
from transfgu.pretrain import main

if __name__ == "__main__":
    main()
