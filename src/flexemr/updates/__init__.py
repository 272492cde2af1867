"""Row updates while serving: a batch of new rows (`RowUpdates`), read from a file (`read_updates`),
applied to every embedding server of a cluster as one new version (`Updater`)."""

from flexemr.updates.rows import RowUpdates, read_updates
from flexemr.updates.updater import UpdateFailed, Updater

__all__ = ["RowUpdates", "UpdateFailed", "Updater", "read_updates"]
