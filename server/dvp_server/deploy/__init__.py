"""Deployments of dvp-serve past one host.

``ray_serve.py``: dvp-serve as a Ray Serve application (``pip install
'dvp-serve[ray]'``), with one weight version for the whole fleet (``fleet.py``,
``routes.py``). Nothing here is imported by the single-host server.
"""
