"""CUB-200-2011 (CaltechDATA, md5-checked); serves both 'cub' and 'cub_hierarchy'.

Usage: python data_scripts/prepare_cub.py --root DIR   (same as: hapkit prepare-data cub --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["cub"], description=__doc__))
