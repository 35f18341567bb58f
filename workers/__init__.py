"""Leaf programs run by the trees in supervisors/."""
