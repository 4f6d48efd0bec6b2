import sys

from dori_utils.book.cli import main

sys.exit(main())
