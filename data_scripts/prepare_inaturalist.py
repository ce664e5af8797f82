"""iNaturalist-2018 images + taxonomy (S3, md5-checked) and the Smooth-AP split lists.

Usage: python data_scripts/prepare_inaturalist.py --root DIR   (same as: hapkit prepare-data inaturalist --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["inaturalist"], description=__doc__))
