"""gradlab's command-line front end (installed as ``gradlab_cli``).

Thin by design: parse, validate, call the core in :mod:`gradlab`, render with rich. Modules here
import torch and the core only inside command bodies, so ``gradlab --help`` stays fast.
"""
