"""DyML-Vehicle / Animal / Product: not downloadable by a script; checks a manual download and
prints exactly what to fetch and where to put it.

Usage: python data_scripts/prepare_dyml.py --name dyml_vehicle --root DIR
       (same as: hapkit prepare-data dyml_vehicle --root DIR)
"""

import sys

from hapkit.data.preparation import main

if __name__ == "__main__":
    sys.exit(main(names=["dyml_vehicle", "dyml_animal", "dyml_product"], description=__doc__))
