"""RAY_ADDRESS in either form: a Jobs API URL or a GCS address gives both; ray:// is serve-only."""

import pytest

from llmplatform.errors import JobError, PlatformError
from llmplatform.rayaddress import RayAddress, jobs_url, parse


def test_a_jobs_url_and_a_gcs_address_each_give_both():
    assert parse("http://head:8265") == RayAddress("http://head:8265", "head:6379", "http://head:8265")
    assert parse("https://ray.example.com:443/") == RayAddress("https://ray.example.com:443/", "ray.example.com:6379", "https://ray.example.com:443")
    assert parse("10.0.0.5:6380") == RayAddress("10.0.0.5:6380", "10.0.0.5:6380", "http://10.0.0.5:8265")
    assert parse(" head ") == RayAddress("head", "head:6379", "http://head:8265")  # a bare host: default ports
    assert jobs_url("head:6379") == jobs_url("http://head:8265") == "http://head:8265"


def test_client_and_auto_addresses_pass_to_ray_init_but_name_no_jobs_api():
    assert parse("ray://head:10001").gcs_address == "ray://head:10001" and parse("ray://head:10001").jobs_url is None
    assert parse("auto").gcs_address == "auto"
    with pytest.raises(JobError, match=r"RAY_ADDRESS 'ray://head:10001' names no Ray Jobs API.*http://HOST:8265.*HOST:6379"):
        jobs_url("ray://head:10001", error=JobError)


@pytest.mark.parametrize("bad", ["", None, "head:port", "grpc://head:1", "http://head:8265/api/jobs", "http://:8265", ":6379"])
def test_anything_else_names_the_variable_and_both_forms(bad):
    with pytest.raises(PlatformError, match=r"--ray-address .*http://HOST:8265 or a GCS address like HOST:6379"):
        parse(bad, source="--ray-address")
