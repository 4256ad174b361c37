# ACL policy for the aimodel-agent system job's workload identity: it reads the
# job list and job specs of every namespace to find the models to prewarm and the
# images to pull, and its own node (driver health, GPUs, the driver's default images).
#   nomad acl policy apply -namespace default -job aimodel-agent aimodel-agent-read docs/aimodel-agent-policy.hcl
namespace "*" {
  capabilities = ["list-jobs", "read-job"]
}

node {
  policy = "read"
}
