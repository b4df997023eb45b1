"""``python -m diffrecon`` (and ``torchrun ... -m diffrecon run ...``): the ``diffrecon``
command."""

from diffrecon.cli.main import main

if __name__ == "__main__":
    main()
