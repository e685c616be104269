"""Lung segmentation: image/mask pairs (pairs.py), U-Net training (train.py), Dice/IoU (metrics.py) and
`segment` on files (segment.py); the network itself is models/unet.py."""
