# The host-volume alternative: mount the NFS export on every client (e.g. in
# /etc/fstab: `nfs.internal:/export/hf-cache /mnt/hf-cache nfs4 hard,nfsvers=4.2,noatime 0 0`)
# and declare it in the client configuration next to the plugin block.
client {
  host_volume "hf-cache" {
    path      = "/mnt/hf-cache"
    read_only = false
  }
}
