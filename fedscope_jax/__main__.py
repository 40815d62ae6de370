"""`python -m fedscope_jax` is the `fedscope` command."""

from fedscope_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
