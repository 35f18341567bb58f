"""A protocol worker script that exits before it says hello."""

import os

os._exit(3)
