# Ollama on the aimodel driver. Ollama pulls its own models into /root/.ollama;
# keep them on the node with a host volume so restarts do not re-download.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

job "ollama" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "ollama" {
    network {
      port "http" {
        static = 11434
      }
    }

    volume "ollama-models" {
      type   = "host"
      source = "ollama-models"
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    service {
      name     = "ollama"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/api/version"
        interval = "10s"
        timeout  = "2s"

        check_restart {
          limit = 3
          grace = "2m"
        }
      }
    }

    task "ollama" {
      driver = "aimodel"

      config {
        engine = "ollama"
        port   = "http"
      }

      volume_mount {
        volume      = "ollama-models"
        destination = "/root/.ollama"
      }

      resources {
        cpu    = 2000
        memory = 16384

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
