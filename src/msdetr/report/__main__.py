"""python -m msdetr.report <sweep dir>: see msdetr.report."""

import sys

from msdetr.report import main

sys.exit(main())
