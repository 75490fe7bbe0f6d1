"""`python -m service.cli ...`: the `nlg` command."""

import sys

from service.cli.parser import main

sys.exit(main())
