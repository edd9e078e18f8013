"""MSI-X: table shadow, mask tracking, PBA, delivery, and the fast/slow paths.

Modules (one concern each): ``layout`` (entry and PBA geometry as data),
``table`` (a table of DWORDs, used by both copies), ``shadow`` (the fast
path's copy and dirty bits), ``pending`` (PBA bits), ``policy`` (which path
serves which access), ``ioreq`` (the channel's records), ``slowpath_worker``
(the separate device-model process), ``slowpath`` (its supervisor and client),
``controller`` (the fast path of one function).

Nothing is imported here, so the worker process starts with only what it uses.
"""
