"""Revisited Oxford / Paris (images from the Oxford VGG pages, ground truth from revisitop's host)
and the optional R1M distractors (100 archives, about a million images).

Usage: python data_scripts/prepare_revisited.py --name roxford5k --root DIR
       (same as: hapkit prepare-data roxford5k --root DIR; names: roxford5k, rparis6k, revisitop1m)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["roxford5k", "rparis6k", "revisitop1m"], description=__doc__))
