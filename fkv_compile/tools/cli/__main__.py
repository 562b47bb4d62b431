"""``python -m fkv_compile.tools.cli``: the ``fkv`` command."""

import sys

from . import main

sys.exit(main())
