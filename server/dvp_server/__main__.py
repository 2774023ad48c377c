"""``python -m dvp_server``: the same as the ``dvp-serve`` command."""

from .cli import main

if __name__ == "__main__":  # guard: engines may spawn worker processes
    main()
