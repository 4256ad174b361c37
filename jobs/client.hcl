# Nomad client agent configuration for nodes that run aimodel tasks.
# Put nomad-driver-aimodel in plugin_dir; Nomad (>= 1.7) only loads plugins
# that have a plugin block here, matched by the binary's file name.

client {
  enabled = true

  # The shared HF cache: the NFS export mounted at the same path on every client
  # (docs/install.md §2). The model servers, the node agent and the driver's
  # hf_cache.host_path below all name this one directory (it is HF_HOME).
  host_volume "hf-cache" {
    path      = "/mnt/hf-cache"
    read_only = false
  }

  # For the node agent's image pull-ahead (jobs/aimodel-agent.nomad.hcl): the Docker
  # socket (root on this node: with ACLs, grant it to the agent's job only; with ACLs
  # off, any job could mount it), and a directory on Docker's data-root filesystem
  # (its free space is the disk guard's measure; nothing in it is read).
  host_volume "docker-sock" {
    path      = "/var/run/docker.sock"
    read_only = false
  }

  # An empty directory on Docker's data-root filesystem: mkdir /var/lib/docker/aimodel-guard
  host_volume "docker-root" {
    path      = "/var/lib/docker/aimodel-guard"
    read_only = true
  }
}

plugin_dir = "/opt/nomad/plugins"

# Nomad's NVIDIA device plugin (nomad-device-nvidia, installed in plugin_dir):
# it fingerprints the GPUs as the `nvidia/gpu` devices every GPU jobspec asks
# for, and Nomad assigns them (NVIDIA_VISIBLE_DEVICES) to the aimodel driver,
# which passes exactly those UUIDs to Docker (docs/install.md §1).
plugin "nomad-device-nvidia" {
  config {
    enabled            = true
    fingerprint_period = "1m"
  }
}

plugin "nomad-driver-aimodel" {
  config {
    endpoint           = "unix:///var/run/docker.sock"
    fingerprint_period = "30s"

    # Opt-ins a job could use against the node (docs/security.md); all off by
    # default. The Ray stack (jobs/ray.nomad.hcl) needs the node's network.
    allow_host_network = true
    allow_privileged   = false
    allow_host_ipc     = false
    volumes {
      enabled = false
    }

    hf_cache {
      host_path      = "/mnt/hf-cache"
      container_path = "/root/.cache/huggingface"
      require_nfs    = false
      min_free       = "20GiB"
    }

    gpu {
      enabled              = true
      visible_devices_from = "nomad"
    }
  }
}
