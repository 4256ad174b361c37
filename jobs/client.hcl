# Nomad client agent configuration for nodes that run aimodel tasks.
# Put nomad-driver-aimodel in plugin_dir; Nomad (>= 1.7) only loads plugins
# that have a plugin block here, matched by the binary's file name.

client {
  enabled = true
}

plugin_dir = "/opt/nomad/plugins"

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
