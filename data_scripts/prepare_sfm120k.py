"""retrieval-SfM-120k (cluster file and images from cnnimageretrieval's host).

Usage: python data_scripts/prepare_sfm120k.py --root DIR   (same as: hapkit prepare-data sfm120k --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["sfm120k"], description=__doc__))
