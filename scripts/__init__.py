# The command-line tools. Installed as quant4.scripts (quant4/scripts is a link to this folder) so that the
# console entry points (quant4.cli) work outside a checkout; each tool is also run directly as scripts/NAME.py.
