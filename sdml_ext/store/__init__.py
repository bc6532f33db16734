"""Storage: everything that writes or checks the user's files and directories (atomic files,
durable JSON, checksums, directories published by rename, writer locks) and the bundle, the
trained model on disk. Nothing here trains or evaluates."""
