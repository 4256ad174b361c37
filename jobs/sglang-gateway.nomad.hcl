# SGLang behind its router: workers register in Consul, the router fronts them.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "model" {
  type    = string
  default = "Qwen/Qwen2.5-7B-Instruct"
}

variable "workers" {
  type    = number
  default = 2
}

# The router's policy (sglang-router: cache_aware, round_robin, random,
# power_of_two). cache_aware keeps requests that share a prefix on one worker's
# prefix cache, so a handful of similar requests all reach the same worker.
variable "router_policy" {
  type    = string
  default = "cache_aware"
}

locals {
  # Runs the router with each worker URL of local/workers.txt as its own argument
  # (`sh -c SCRIPT NAME ARGS...`: the driver's --host/--port arrive as "$@"; the
  # URLs are split on whitespace, never globbed). With no worker registered yet it
  # waits (the template restarts the task when the list changes).
  router_script = <<-EOT
    set -f
    dir="$NOMAD_TASK_DIR"
    [ -n "$dir" ] || dir=/local
    workers="$dir/workers.txt"
    while [ -z "$(tr -d '[:space:]' < "$workers" 2>/dev/null)" ]; do
      echo "no sglang-worker registered in Consul yet; waiting" >&2
      sleep 10
    done
    exec python3 -m sglang_router.launch_router "$@" --worker-urls $(cat "$workers")
    EOT
}

job "sglang" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "workers" {
    count = var.workers

    network {
      port "http" {}
    }

    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = true
    }

    restart {
      attempts = 5
      interval = "30m"
      delay    = "30s"
      mode     = "delay"
    }

    update {
      max_parallel     = 1
      healthy_deadline = "30m"
      progress_deadline = "40m"
    }

    service {
      name     = "sglang-worker"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          grace = "30m"
        }
      }
    }

    task "worker" {
      driver = "aimodel"

      config {
        engine = "sglang"
        model  = var.model
        port   = "http"
        args   = ["--mem-fraction-static", "0.85"]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 4000
        memory = 24576

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }

  group "router" {
    network {
      port "http" {
        static = 30000
      }
    }

    service {
      name     = "sglang"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "router" {
      driver = "aimodel"

      # The worker list comes from Consul, one URL per line; the router restarts
      # when it changes. Each URL becomes its own argument (--worker-urls A B ...);
      # before any worker is registered the list is empty and the router waits
      # instead of starting with a bogus empty URL.
      template {
        destination = "local/workers.txt"
        change_mode = "restart"
        data        = <<-EOT
        {{ range service "sglang-worker" }}http://{{ .Address }}:{{ .Port }}
        {{ end }}
        EOT
      }

      config {
        engine = "sglang-router"
        port   = "http"
        entrypoint = ["/bin/sh", "-c", local.router_script, "sglang-router"]
        args       = ["--policy", var.router_policy]
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
