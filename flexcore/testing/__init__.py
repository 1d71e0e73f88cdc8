"""Test doubles that ship with FlexCore (usable by applications' own tests too).

- `windmill`: an aiohttp stand-in for the Windmill endpoints FlexCore uses.
"""
