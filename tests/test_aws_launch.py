"""cluster.yaml launched on a stand-in for AWS: moto's server on 127.0.0.1 (EC2, IAM, STS, S3,
CloudFormation), fake credentials from the environment only.

The stack of cluster-iam.yaml is created on it as a user creates it; then Ray's own launcher code runs
with cluster.yaml: `ray up`'s config bootstrap (`_bootstrap_config`: the instance types, the schema,
`bootstrap_aws`: key pair, subnets, security group) and its launch of the head, then what the head's
autoscaler runs to add a worker (Ray's node launcher and AWSNodeProvider: list, launch, tag, look up
the address, terminate). Nothing connects to the instances (moto's addresses are made up), and no
`ray up` runs as a whole (it would SSH into them).

moto checks no IAM permission, so this test does: every AWS call of the worker's launch, recorded
through boto3's event hooks, becomes the IAM requests AWS makes of it (RunInstances also asks for
iam:PassRole on the profile's role, ec2:CreateTags for tags at launch, ssm:GetParameters for a
`resolve:ssm:` image), and each must be allowed by the head role's policies as the stack left them in
moto's IAM. The evaluator is this file's (actions and resources with wildcards, StringEquals/StringLike
conditions, Deny first), not AWS's; it fails on a call or a condition it does not know.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REGION, ACCOUNT, BUCKET = "us-west-2", "123456789012", "robint-test-bucket"

pytestmark = pytest.mark.skipif(not MOTO_SERVER.exists(), reason="needs moto's server: pip install 'moto[server]'")

# The node types of cluster.yaml as of commit 301d40c (before cluster-iam.yaml): one image looked up
# through an SSM parameter at each launch, and the head's default role made by Ray (AmazonEC2FullAccess,
# AmazonS3FullAccess) also given to the workers.
OLD_NODE_TYPES = """
head:
  resources: {"CPU": 0, "GPU": 0}
  node_config:
    InstanceType: m6i.2xlarge
    ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
  min_workers: 0
  max_workers: 0
gpu_worker:
  resources: {"CPU": 8, "GPU": 1}
  node_config:
    InstanceType: g5.2xlarge
    ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
    IamInstanceProfile: {Name: ray-autoscaler-v1}
  min_workers: 1
  max_workers: 4
"""


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """moto's server on a free loopback port, with AWS's managed policies loaded into its IAM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def aws(moto_endpoint, tmp_path_factory):
    """This process's boto3 pointed at moto with fake credentials from the environment (no file of
    ~/.aws read: HOME is a temporary folder, where Ray also writes its key pair's .pem), and every AWS
    call recorded: yields the list the calls go to."""
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    home = tmp_path_factory.mktemp("home")
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "HOME": str(home),
    }

    def clear_caches():  # Ray's boto3 clients, made from the default session, live in lru caches
        aws_utils.resource_cache.cache_clear()
        aws_utils.client_cache.cache_clear()
        aws_config._get_subnets_or_die.cache_clear()
        boto3.DEFAULT_SESSION = None

    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            patch.delenv(key, raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        # Ray waits 15 s for IAM to propagate after it makes its default role (twice): moto needs no wait.
        patch.setattr(aws_config, "time", SimpleNamespace(sleep=lambda seconds: None))
        clear_caches()
        calls: list[Call] = []
        boto3.setup_default_session()  # the session of Ray's clients (boto3.resource / boto3.client)
        boto3.DEFAULT_SESSION.events.register(
            "before-parameter-build",
            lambda params, model, **_: calls.append(
                Call(model.service_model.signing_name, model.name, copy.deepcopy(params))
            ),
        )
        try:
            yield SimpleNamespace(endpoint=moto_endpoint, calls=calls)
        finally:
            clear_caches()


class Call(NamedTuple):
    service: str  # the IAM prefix of the service: ec2, iam, ssm, s3
    operation: str
    params: dict


class Request(NamedTuple):
    """One authorisation AWS makes for a call: an action on a resource, with its condition keys."""

    action: str
    resource: str
    context: dict

    def __str__(self) -> str:
        return f"{self.action} {self.resource}"


def create_stack(template: str) -> None:
    import boto3

    boto3.client("cloudformation", region_name=REGION).create_stack(
        StackName="robint-ray-iam",
        TemplateBody=template,
        Parameters=[{"ParameterKey": "BucketName", "ParameterValue": BUCKET}],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    stack = boto3.client("cloudformation", region_name=REGION).describe_stacks(StackName="robint-ray-iam")
    assert stack["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE", stack


def stand_in_image() -> str:
    """An image of moto's EC2 (it ships a few), in place of the Deep Learning AMI's id."""
    import boto3

    return boto3.client("ec2", region_name=REGION).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


class Launch(NamedTuple):
    head: dict  # the head instance, as EC2 describes it
    worker: dict  # the worker instance, before the autoscaler terminated it
    up_calls: list  # the AWS calls of `ray up`'s bootstrap and head launch (the user's credentials)
    calls: list  # the AWS calls the head's autoscaler made to launch, tag, find and terminate it


def launch(config: dict, calls: list) -> Launch:
    """`ray up`'s bootstrap and head launch (the user's credentials), then one worker of the first
    non-head node type as the head's autoscaler launches it (the config `ray up` copies to the head)."""
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.event_summarizer import EventSummarizer
    from ray.autoscaler._private.node_launcher import BaseNodeLauncher
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler._private.util import ConcurrentCounter
    from ray.autoscaler.tags import (
        NODE_KIND_HEAD,
        NODE_KIND_WORKER,
        STATUS_SETTING_UP,
        STATUS_UNINITIALIZED,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    ec2 = boto3.client("ec2", region_name=REGION)

    def described(instance_id: str) -> dict:
        return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    # ray up: commands.get_or_create_head_node's launch of the head
    first = len(calls)
    config = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    head_type = config["head_node_type"]
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head_config = {**config.get("head_node", {}), **config["available_node_types"][head_type]["node_config"]}
    head_tags = {
        TAG_RAY_NODE_KIND: NODE_KIND_HEAD,
        TAG_RAY_USER_NODE_TYPE: head_type,
        TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-head",
        TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
    }
    (head_id,) = provider.create_node(head_config, head_tags, 1)

    # the head's autoscaler, with the config ray up writes there (commands._set_up_config_for_head_node)
    remote = copy.deepcopy(config)
    remote.pop("head_node", None)
    worker_type = next(name for name in remote["available_node_types"] if name != head_type)
    up_calls, first = calls[first:], len(calls)
    provider = AWSNodeProvider(remote["provider"], remote["cluster_name"])
    launcher = BaseNodeLauncher(provider, ConcurrentCounter(), EventSummarizer(), NodeProviderAvailabilityTracker())
    launcher.pending.inc(worker_type, 1)
    created = launcher.launch_node(remote, 1, worker_type) or {}
    assert len(created) == 1, f"no worker launched: {launcher.event_summarizer.summary()}"
    (worker_id,) = created
    assert worker_id in provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    provider.set_node_tags(worker_id, {TAG_RAY_NODE_STATUS: STATUS_SETTING_UP})  # what its updater does
    provider.internal_ip(worker_id)  # where the updater would SSH to (nothing does here)
    worker = described(worker_id)
    provider.terminate_node(worker_id)  # idle for idle_timeout_minutes
    return Launch(described(head_id), worker, up_calls, calls[first:])


def role_statements(role_name: str) -> list[dict]:
    """Every statement of a role's policies (inline and attached), as its IAM holds them."""
    import boto3

    iam = boto3.client("iam")
    documents = [
        iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    ]
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        documents.append(
            iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
        )
    statements = []
    for document in documents:
        document = json.loads(document) if isinstance(document, str) else document
        found = document["Statement"]
        statements += [found] if isinstance(found, dict) else found
    return statements


def profile_role(profile: dict) -> str:
    """The ARN of the role in an instance profile given as {Name: ...} or {Arn: ...}."""
    import boto3

    name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[-1]
    (role,) = boto3.client("iam").get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
    return role["Arn"]


def glob(pattern: str, value: str, *, case: bool = True) -> bool:
    """IAM's wildcards: * any run of characters, ? one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=0 if case else re.IGNORECASE) is not None


def _listed(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def condition_holds(condition: dict, context: dict) -> bool:
    keys = {k.lower(): v for k, v in context.items()}
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            have = keys.get(key.lower())
            if operator not in ("StringEquals", "StringLike"):
                raise AssertionError(f"the test's IAM evaluator knows no condition operator {operator}")
            if have is None:
                return False
            if not any(have == w if operator == "StringEquals" else glob(w, have) for w in _listed(wanted)):
                return False
    return True


def statement_applies(statement: dict, request: Request) -> bool:
    if "Action" in statement:
        action = any(glob(a, request.action, case=False) for a in _listed(statement["Action"]))
    else:
        action = not any(glob(a, request.action, case=False) for a in _listed(statement["NotAction"]))
    if "Resource" in statement:
        resource = any(glob(r, request.resource) for r in _listed(statement["Resource"]))
    else:
        resource = not any(glob(r, request.resource) for r in _listed(statement["NotResource"]))
    return action and resource and condition_holds(statement.get("Condition", {}), request.context)


def allowed(statements: list[dict], request: Request) -> bool:
    """An explicit Deny wins, then an Allow must apply, else it is denied (IAM's order)."""
    applying = [s["Effect"] for s in statements if statement_applies(s, request)]
    return "Deny" not in applying and "Allow" in applying


def instance_arn(instance_id: str) -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{instance_id}"


def requests_of(call: Call) -> list[Request]:
    """The IAM authorisations AWS makes for one call (those of EC2's RunInstances after AWS's
    documentation of its resource types and of tagging and passing a role at launch)."""
    import boto3

    action, params = f"{call.service}:{call.operation}", call.params
    if action == "ec2:DescribeInstances":
        return [Request(action, "*", {})]
    if action in ("ec2:CreateTags", "ec2:TerminateInstances"):
        ids = params.get("Resources") or params["InstanceIds"]
        described = boto3.client("ec2", region_name=REGION).describe_instances(InstanceIds=ids)
        tags = {
            i["InstanceId"]: {f"ec2:ResourceTag/{t['Key']}": t["Value"] for t in i.get("Tags", [])}
            for r in described["Reservations"]
            for i in r["Instances"]
        }
        return [Request(action, instance_arn(i), tags[i]) for i in ids]
    if action == "ec2:RunInstances":
        request_tags = {
            f"aws:RequestTag/{t['Key']}": t["Value"]
            for spec in params.get("TagSpecifications", [])
            if spec["ResourceType"] == "instance"
            for t in spec["Tags"]
        }
        image = params["ImageId"]
        ec2 = f"arn:aws:ec2:{REGION}:{ACCOUNT}"
        requests = [Request(action, instance_arn("*"), request_tags)]
        requests += [
            Request(action, arn, {})
            for arn in [
                f"arn:aws:ec2:{REGION}::image/{'*' if image.startswith('resolve:ssm:') else image}",
                f"{ec2}:subnet/{params['SubnetId']}",
                *[f"{ec2}:security-group/{g}" for g in params.get("SecurityGroupIds", [])],
                *([f"{ec2}:key-pair/{params['KeyName']}"] if "KeyName" in params else []),
                f"{ec2}:volume/*",
                f"{ec2}:network-interface/*",
            ]
        ]
        if image.startswith("resolve:ssm:"):  # EC2 resolves the parameter as the caller
            requests.append(Request("ssm:GetParameters", f"arn:aws:ssm:{REGION}::parameter{image[12:]}", {}))
        if request_tags:
            requests.append(
                Request("ec2:CreateTags", instance_arn("*"), {"ec2:CreateAction": "RunInstances", **request_tags})
            )
        if "IamInstanceProfile" in params:
            role = profile_role(params["IamInstanceProfile"])
            requests.append(Request("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"}))
        return requests
    raise AssertionError(f"{action}: a call this test has no IAM rule for; add one to requests_of")


def denied(statements: list[dict], requests: list[Request]) -> list[str]:
    return [str(r) for r in requests if not allowed(statements, r)]


class Checked(NamedTuple):
    """A launch, with what the checks need read from moto while it still holds the launch."""

    launch: Launch
    requests: list  # the IAM requests of the worker's launch (Request)
    head: list  # the statements of the head role's policies
    worker: list  # the statements of the worker role's policies
    seconds: float  # from the stack's creation to the worker terminated


def checked_launch(aws, config: dict, template: str | None) -> Checked:
    started = time.monotonic()
    if template:
        create_stack(template)
    config = yaml.safe_load(yaml.safe_dump(config).replace(IMAGE, stand_in_image()))
    result = launch(config, aws.calls)
    requests = [r for call in result.calls for r in requests_of(call)]
    head_role = profile_role(result.head["IamInstanceProfile"]).rsplit("/", 1)[-1]
    worker_role = profile_role(result.worker["IamInstanceProfile"]).rsplit("/", 1)[-1]
    return Checked(
        result, requests, role_statements(head_role), role_statements(worker_role), time.monotonic() - started
    )


IMAGE = "ami-pinned-image"  # a stand-in for the image id a user pins, replaced by one moto has


def cluster_yaml() -> dict:
    """cluster.yaml, its pinned image replaced by IMAGE (the test checks that it is one id for all)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["ImageId"] = IMAGE
    return config


@pytest.fixture(scope="module")
def launched(aws) -> Checked:
    """The stack of cluster-iam.yaml, then cluster.yaml's head and one worker."""
    return checked_launch(aws, cluster_yaml(), (ROOT / "cluster-iam.yaml").read_text())


def test_cluster_yaml_pins_one_image_for_every_node():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1 and next(iter(images)).startswith("ami-"), images  # no resolve:ssm: at launch


def test_the_worker_starts_with_the_worker_profile_and_the_pinned_image(launched):
    head, worker = launched.launch.head, launched.launch.worker
    assert worker["ImageId"] == head["ImageId"] != IMAGE  # moto's image, put where cluster.yaml pins one
    assert worker["IamInstanceProfile"]["Arn"] == f"arn:aws:iam::{ACCOUNT}:instance-profile/robint-ray-worker"
    assert head["IamInstanceProfile"]["Arn"] == f"arn:aws:iam::{ACCOUNT}:instance-profile/robint-ray-head"
    assert worker["InstanceType"] == "g5.2xlarge" and head["InstanceType"] == "m6i.2xlarge"
    # ray up made no IAM role (Ray's default role, and its two 15 s waits, are for a head without a profile)
    assert not [c for c in launched.launch.up_calls if c.service == "iam"]
    print(f"stack, bootstrap, head and worker on moto: {launched.seconds:.1f} s")


def test_the_head_role_allows_every_call_of_a_workers_launch(launched):
    operations = {f"{c.service}:{c.operation}" for c in launched.launch.calls}
    assert operations == {"ec2:RunInstances", "ec2:DescribeInstances", "ec2:CreateTags", "ec2:TerminateInstances"}
    requested = {str(r) for r in launched.requests}
    assert f"iam:PassRole arn:aws:iam::{ACCOUNT}:role/robint-ray-worker" in requested
    assert f"ec2:CreateTags arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*" in requested  # tags at launch
    assert denied(launched.head, launched.requests) == []


LAUNCH_ACTIONS = [
    "ec2:DescribeInstances",
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:TerminateInstances",
    "iam:PassRole",
]


@pytest.mark.parametrize("action", LAUNCH_ACTIONS)
def test_the_check_fails_where_the_head_policy_lacks_one_action(launched, action):
    """The head role's statements as the stack made them, one action taken out: a call is denied."""
    without = [{**s, "Action": [a for a in _listed(s["Action"]) if a != action]} for s in launched.head]
    assert any(d.startswith(action + " ") for d in denied(without, launched.requests))


def test_the_check_fails_where_the_head_may_pass_another_role(launched):
    aimed = [
        {**s, "Resource": f"arn:aws:iam::{ACCOUNT}:role/robint-ray-head"} if s["Action"] == "iam:PassRole" else s
        for s in launched.head
    ]
    assert denied(aimed, launched.requests) == [f"iam:PassRole arn:aws:iam::{ACCOUNT}:role/robint-ray-worker"]


def test_the_check_fails_for_instances_of_another_cluster(launched):
    """Launched with another cluster's tags, the head role may not launch or tag them."""
    other = [
        Request(
            r.action,
            r.resource,
            {k: "other-cluster" if k.endswith("ray-cluster-name") else v for k, v in r.context.items()},
        )
        for r in launched.requests
    ]
    assert {d.split()[0] for d in denied(launched.head, other)} == {
        "ec2:RunInstances",
        "ec2:CreateTags",
        "ec2:TerminateInstances",
    }


def test_the_workers_role_reaches_the_bucket_and_nothing_else(launched):
    for statements in (launched.worker, launched.head):
        assert allowed(statements, Request("s3:PutObject", f"arn:aws:s3:::{BUCKET}/runs/x/best/model.safetensors", {}))
        assert allowed(statements, Request("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {}))
        assert not allowed(statements, Request("s3:GetObject", "arn:aws:s3:::another-bucket/x", {}))
    assert denied(launched.worker, launched.requests) == [str(r) for r in launched.requests]  # no EC2, no PassRole


def test_the_stack_made_the_bucket(launched):
    import boto3

    assert boto3.client("s3").head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_the_check_rejects_the_old_configs_policies(aws, launched):
    """cluster.yaml as of 301d40c: Ray makes its default head role (AmazonEC2FullAccess,
    AmazonS3FullAccess), the workers carry the same profile, and the image is an SSM parameter: the
    head may neither pass that role nor read the parameter, so EC2 would refuse to start a worker.
    (In the moto of the launch above: Ray makes its own role, key pair name and instances beside.)"""
    config = cluster_yaml()
    config["available_node_types"] = yaml.safe_load(OLD_NODE_TYPES)
    old = checked_launch(aws, config, template=None)
    head_role = profile_role(old.launch.head["IamInstanceProfile"])
    assert head_role == f"arn:aws:iam::{ACCOUNT}:role/ray-autoscaler-v1"
    parameter = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    assert denied(old.head, old.requests) == [
        f"ssm:GetParameters arn:aws:ssm:{REGION}::parameter{parameter}",
        f"iam:PassRole {head_role}",
    ]
