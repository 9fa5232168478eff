"""skingen: keyboard-skin generation with an SDXL ControlNet.

One module per concept; the top-level scripts are the stages.
"""

__version__ = "0.1.0"
