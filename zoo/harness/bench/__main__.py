"""``python -m zoo.harness.bench ...``: the same as ``python -m zoo bench ...``."""

import sys

from zoo.errors import UsageError, zoo_error_in_chain
from zoo.harness.bench.driver import main

try:
    code = main()
except Exception as err:  # one line for what the user can fix (as `zoo` prints it); a traceback for bugs
    cause = zoo_error_in_chain(err)
    if cause is None:
        raise
    print(f"zoo: error: {cause}", file=sys.stderr)
    code = 2 if isinstance(cause, UsageError) else 1
sys.exit(code)
