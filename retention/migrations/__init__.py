"""Schema migrations of the SQLite store, applied in order on open.

Each ``NNNN_name.sql`` moves the schema from version NNNN-1 to NNNN (SQLite's
``PRAGMA user_version``); the store runs the missing ones, each in one
transaction, and refuses a database whose version is newer than the last file.
"""
