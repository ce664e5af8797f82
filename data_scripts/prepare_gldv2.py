"""Google Landmarks v2, clean training set, flat (gldv2) or hierarchical (gldv2_hier): metadata
and the 500 md5-checked train archives from cvdfoundation's S3 bucket.

Usage: python data_scripts/prepare_gldv2.py --name gldv2_hier --root DIR
       (same as: hapkit prepare-data gldv2_hier --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["gldv2_hier", "gldv2"], description=__doc__))
