# The shared HF cache as an NFS CSI volume (register with `nomad volume register`).
# Recommended NFS mount options: hard (never return I/O errors to a loading model
# server; a stale server blocks instead, which the plugin's probe timeouts report),
# nfsvers=4.2, and NOT nolock: with nolock flock() excludes nothing across nodes
# (aimodel-agent uses its own O_EXCL lease files, so it stays safe either way).
type      = "csi"
id        = "hf-cache"
name      = "hf-cache"
plugin_id = "nfs"

capability {
  access_mode     = "multi-node-multi-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type     = "nfs"
  mount_flags = ["hard", "nfsvers=4.2", "noatime"]
}

context {
  server = "nfs.internal"
  share  = "/export/hf-cache"
}
