"""Stanford Online Products (zip from the Stanford / authors' mirrors, md5-checked).

Usage: python data_scripts/prepare_sop.py --root DIR   (same as: hapkit prepare-data sop --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["sop"], description=__doc__))
