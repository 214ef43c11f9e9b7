"""kdpipe: reproducible knowledge distillation.

The library holds pure functions and small classes; it never imports typer or
DVC and never decides file paths. The thin commands in ``stages/`` do that.
"""

__version__ = "0.1.0"
