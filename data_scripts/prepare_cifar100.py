"""CIFAR-100 python version (University of Toronto, md5-checked).

Usage: python data_scripts/prepare_cifar100.py --root DIR   (same as: hapkit prepare-data cifar100 --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["cifar100"], description=__doc__))
