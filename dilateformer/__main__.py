import sys

from dilateformer.cli import main

sys.exit(main())
