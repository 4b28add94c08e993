"""Monitoring of served traffic: a window of recent images, its estimated error and its drift (issue 15).

May import :mod:`models.scoring` and below, never :mod:`service`.
"""
