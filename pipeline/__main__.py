"""`python -m pipeline` is the same as the `aiayn` command."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
