"""``python -m tagger``: the same as the ``tagger`` command."""

from tagger.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="tagger")
