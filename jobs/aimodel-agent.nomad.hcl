# The node agent: one per client (a system job). It keeps the manifest's models,
# and the model of every `driver = "aimodel"` task Nomad knows, warm in the
# shared HF cache, fetching every byte once across all nodes; it records warm
# models for the driver's fingerprint (`driver.aimodel.warm.<org>/<name>`) and
# evicts cold ones above the watermark; it pulls the engine images those tasks
# will run into this node's Docker engine ahead of placement.
#   nomad var put nomad/jobs/aimodel-agent hf_token=hf_xxx status_token=<random>
#   nomad acl policy apply -namespace default -job aimodel-agent aimodel-agent-read docs/aimodel-agent-policy.hcl
#   nomad job run jobs/aimodel-agent.nomad.hcl
# Nomad is reached through the task API socket (${NOMAD_SECRETS_DIR}/api.sock, Nomad >= 1.5)
# with the task's workload identity: no token is stored and none crosses the network.
# The binary is installed at /usr/local/bin/aimodel-agent on every client (docs/install.md §4):
# the exec driver's chroot contains /usr (its default chroot_env), not the client's plugin_dir.
# The task runs as `aimodel`, the cache's owner (docs/install.md §2: a system user of that name
# on every client, `chown aimodel: /mnt/hf-cache`); the plugin, root, creates what it adds to the
# cache as that owner. Nomad's default user.denylist keeps root out of exec tasks, and we leave it so.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "metrics_port" {
  type    = number
  default = 9464
}

variable "target_free" {
  type        = string
  default     = "200GiB"
  description = "Evict least-recently-used models until the cache has this much free."
}

job "aimodel-agent" {
  region      = var.region
  datacenters = var.datacenters
  type        = "system"
  priority    = 80

  group "agent" {
    network {
      port "metrics" {
        static = var.metrics_port
      }
    }

    # The same export the model servers read (jobs/hf-cache-host-volume.hcl), writable here.
    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = false
    }

    # Image pull-ahead (images { } below): the node's Docker engine, and a directory on
    # the filesystem of Docker's data root for the disk guard (only its free space is read).
    # The socket is root-equivalent: `aimodel` must be in the `docker` group, and only this
    # operator-run job gets it. Remove both volumes and the images block to turn pull-ahead off.
    volume "docker-sock" {
      type      = "host"
      source    = "docker-sock"
      read_only = false
    }

    volume "docker-root" {
      type      = "host"
      source    = "docker-root"
      read_only = true
    }

    restart {
      attempts = 10
      interval = "30m"
      delay    = "15s"
      mode     = "delay"
    }

    update {
      max_parallel = 1
      stagger      = "30s"
    }

    service {
      name     = "aimodel-agent"
      port     = "metrics"
      provider = "consul"
      tags     = ["metrics", "prometheus"]

      check {
        type     = "http"
        path     = "/health"
        interval = "15s"
        timeout  = "3s"
      }
    }

    task "agent" {
      driver = "exec"
      user   = "aimodel"

      config {
        command = "/usr/local/bin/aimodel-agent"
        args    = ["run", "--config", "local/agent.hcl"]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/mnt/hf-cache"
      }

      volume_mount {
        volume      = "docker-sock"
        destination = "/var/run/docker.sock"
      }

      volume_mount {
        volume      = "docker-root"
        destination = "/docker-root"
        read_only   = true
      }

      # The agent reads its own node (driver health, GPUs, the driver's default images).
      env {
        AIMODEL_NODE_ID = "${node.unique.id}"
      }

      # The manifest. Models listed here are prewarmed on every node's view of the
      # cache; `pin = true` keeps one from ever being evicted. Every agent sharing
      # one export should use the same manifest (their gc honours the same pins).
      template {
        destination = "local/agent.hcl"
        change_mode = "restart"
        data        = <<-EOT
          hf_home  = "/mnt/hf-cache"
          listen   = "0.0.0.0:{{ env "NOMAD_PORT_metrics" }}"
          interval = "10m"

          models = [
            { repo = "mistralai/Mistral-7B-Instruct-v0.3", include = ["*.safetensors", "*.json", "tokenizer.model"], pin = true },
            { repo = "Qwen/Qwen2.5-0.5B-Instruct" },
            # Ollama models go to Ollama's own store, <hf_home>/ollama (ollama_models to change it).
            { repo = "ollama://llama3.2:3b" },
            { repo = "ollama://codellama:7b" },
          ]

          nomad {
            namespace = "*"
          }

          gc {
            target_free = "${var.target_free}"
          }

          # Pull the engine image of every aimodel task this node could run before
          # Nomad places it (docs/operations.md, "Engine images pulled ahead").
          images {
            docker    = "unix:///var/run/docker.sock"
            data_root = "/docker-root"
            min_free  = "50GiB"
          }
        EOT
      }

      # The workload identity in NOMAD_TOKEN authenticates the agent on the task API socket.
      identity {
        env = true
      }

      # Secrets come from Nomad Variables, into the environment only (never the config file).
      template {
        destination = "secrets/agent.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/aimodel-agent" }}
          HF_TOKEN={{ .hf_token }}
          AIMODEL_STATUS_TOKEN={{ .status_token }}
          {{ end }}
        EOT
      }

      resources {
        cpu    = 1000
        memory = 512
      }

      kill_timeout = "10s"
    }
  }
}
