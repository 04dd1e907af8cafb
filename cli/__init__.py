"""The face of the project: the ``mae`` command (``cli.main``) and ``mae demo`` (``cli.demo``).

It sits above every stage and imports each one lazily when its subcommand runs; nothing imports it.
"""
