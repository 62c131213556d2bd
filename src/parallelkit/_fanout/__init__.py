"""Bounded fan-out: ``gather``, ``map`` and ``imap`` on the one worker loop.

``fanout`` holds ``gather`` and ``map``; ``imap`` streams the same work from an
``async with`` block. Options (limit, rate, timeout, retry) become one per-item call.
"""
