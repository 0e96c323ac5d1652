"""File systems inside partition images, read and written without mounting.

- `builder.fs.ext4`: ext4 images through e2fsprogs (debugfs, resize2fs, e2fsck, dumpe2fs).
- `builder.fs.fat`: FAT volumes through mtools and dosfstools.
"""
