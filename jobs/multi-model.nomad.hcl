# The orchestrator + agents setup: one large model on the 8-GPU node that plans,
# four small models on 16 GB nodes that execute. Both on the shared HF cache.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "orchestrator_model" {
  type    = string
  default = "mistralai/Mistral-Small-24B-Instruct-2501"
}

variable "agent_model" {
  type    = string
  default = "mistralai/Mistral-7B-Instruct-v0.3"
}

variable "large_node_class" {
  type    = string
  default = "gpu-large"
}

job "multi-model" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "orchestrator" {
    count = 1

    # The large node: by node class, and it must report 8 GPUs through the driver.
    constraint {
      attribute = "${node.class}"
      value     = var.large_node_class
    }

    constraint {
      attribute = "${attr.driver.aimodel.gpu.count}"
      operator  = ">="
      value     = "8"
    }

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
      interval = "1h"
      delay    = "1m"
      mode     = "delay"
    }

    update {
      max_parallel      = 1
      healthy_deadline  = "45m"
      progress_deadline = "60m"
      auto_revert       = true
    }

    service {
      name     = "orchestrator"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/health"
        interval = "15s"
        timeout  = "5s"

        check_restart {
          limit = 3
          grace = "45m"
        }
      }
    }

    task "orchestrator" {
      driver = "aimodel"

      config {
        engine            = "vllm"
        model             = var.orchestrator_model
        served_model_name = "orchestrator"
        port              = "http"
        shm_size          = "64g"
        args              = ["--max-model-len", "32768", "--enable-auto-tool-choice", "--tool-call-parser", "mistral"]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 16000
        memory = 131072

        device "nvidia/gpu" {
          count = 8
        }
      }

      kill_timeout = "90s"
    }
  }

  group "agents" {
    count = 4

    # One agent per 16 GB-class GPU node.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

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
      max_parallel     = 2
      healthy_deadline = "30m"
      progress_deadline = "40m"
    }

    service {
      name     = "agent"
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

    task "agent" {
      driver = "aimodel"

      config {
        engine            = "vllm"
        model             = var.agent_model
        served_model_name = "agent"
        port              = "http"
        shm_size          = "8g"
        args              = ["--max-model-len", "16384", "--gpu-memory-utilization", "0.90"]
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

          constraint {
            attribute = "${device.attr.memory}"
            operator  = ">="
            value     = "16 GiB"
          }
        }
      }
    }
  }
}
