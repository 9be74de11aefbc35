"""Decode benchmark (issue 2, part 7): the same as `fleet bench decode`; see --help."""

from fleetlm.cli import main

if __name__ == "__main__":
    import sys

    sys.argv = ["fleet", "bench", "decode", *sys.argv[1:]]
    main()
