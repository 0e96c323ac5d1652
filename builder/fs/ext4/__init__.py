"""ext4 images read and edited with e2fsprogs (debugfs, resize2fs, e2fsck, dumpe2fs): no mount, no root.

How e2fsprogs is driven, and why (facts checked against the e2fsprogs 1.45-1.47 sources):

- Edits are batched: an `EditBatch` records operations, plans them against a model of the
  directories involved (read with ONE read-only debugfs run), and applies them in ONE
  `debugfs -w -f -` run, however many files. Removing existing trees costs one extra read-only
  run per tree level (to list them and stat every inode to be removed).
- debugfs exits 0 when commands fail. The commands of each operation are followed by a marker
  line that is an unknown command (`@@airbox:<k>`); debugfs reports it on stderr right after
  the errors of the commands before it, so each error is tied to its operation, and so to the
  image path the caller named. On stdout, the echoed command lines delimit each output.
- Script lines are split by libss: whitespace separates words, `"..."` quotes, `""` inside
  quotes is one `"`. A line is read with fgets and cut at the first CR or LF, so names and
  symlink targets holding CR or LF cannot be expressed; they are refused, naming the path.
- Every command is addressed by inode number (`<12>`) or by a bare name relative to a `cd`:
  debugfs 1.45's `write`/`mknod` link their name argument into the current directory literally
  (a '/' in it would create a bogus entry), and `mkdir /a/b` through a symlinked `/a` corrupts
  the file system (a half-made directory) instead of failing. The planner resolves every parent
  (symlinks included) before any write, so no command can hit those paths.
- `rm`/`rmdir` free an inode's blocks but not its external xattr block (a leak e2fsck reports),
  and libext2fs never frees such a block when xattrs are removed either. Before the batch, one
  xattr of each inode about to be freed is removed (libext2fs copies a shared block, dropping
  its reference count properly); after the inode goes, its block is freed through a throw-away
  inode that maps it. See _Planner.release_xattr_blocks.
- Determinism: libext2fs takes "now" from E2FSPROGS_FAKE_TIME (1.47.2+: SOURCE_DATE_EPOCH)
  for new inodes (atime/mtime/ctime/crtime), dtime and the superblock write time; e2fsck takes
  it from E2FSCK_TIME. All are set to the batch epoch (tests check every new inode's four
  times); the ctime of existing inodes an edit changes, and the mtime/ctime of directories
  whose entries change, are set with `set_inode_field`. Inode and block allocation and the
  directory hash (seeded in the superblock) are deterministic, and libext2fs sets no random
  inode generation, so the same image plus the same batch gives the same bytes, whatever the
  clock, TZ or umask. An epoch of 0 is refused: libext2fs reads 0 as "use the clock".
- e2fsck runs with our own E2FSCK_CONFIG (`broken_system_clock`): a vendor image written after
  the build epoch would otherwise be "fixed" for times "in the future", and a user's
  /etc/e2fsck.conf cannot change what the build does. Tools run with LC_ALL=C so their output
  can be parsed, and with debugfs's pager disabled.
- No feature is ever added: debugfs, resize2fs and e2fsck -p keep the feature set (tests check
  it), so an image made for the device's e2fsck 1.45.4 stays checkable there.

Minimum e2fsprogs: 1.45 (Ubuntu 20.04, the vendor's build host; the device runs 1.45.4); the
tests pass on 1.45.5 and 1.47.0. Used: `ea_set -f`/`ea_get -f`/`ea_rm` and `symlink` (debugfs
1.43+), `-f -` scripts, E2FSPROGS_FAKE_TIME in ext2fs_open, `set_inode_field ... @<seconds>`,
`resize2fs -M` and E2FSCK_TIME. (1.45 turns a hash-indexed directory it adds to into a linear
one; 1.46+ inserts into the index. Both are valid and e2fsck-clean.)
"""

from builder.fs.ext4.batch import EditBatch
from builder.fs.ext4.e2fsprogs import e2fsprogs_version, require_e2fsprogs
from builder.fs.ext4.image import Ext4Image
from builder.fs.ext4.inodes import DirEntry, EditSummary, Ext4Info, FileType, Inode, SpaceEstimate
from builder.fs.ext4.sparse import copy_sparse

__all__ = [
    "DirEntry",
    "EditBatch",
    "EditSummary",
    "Ext4Image",
    "Ext4Info",
    "FileType",
    "Inode",
    "SpaceEstimate",
    "copy_sparse",
    "e2fsprogs_version",
    "require_e2fsprogs",
]
