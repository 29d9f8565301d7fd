"""Creates an IAM user with one inline policy in a moto server and prints its access key.

Usage: iam_user.py ENDPOINT POLICY_JSON_FILE
Prints "ACCESS_KEY_ID SECRET_ACCESS_KEY". Makes exactly 3 requests (the tests count them, because
moto starts enforcing IAM after a set number of requests).
"""

import sys

import boto3


def main() -> None:
    endpoint, policy_file = sys.argv[1], sys.argv[2]
    with open(policy_file, encoding="utf-8") as f:
        policy = f.read()
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_user(UserName="static-ingress")
    iam.put_user_policy(UserName="static-ingress", PolicyName="instance-role", PolicyDocument=policy)
    key = iam.create_access_key(UserName="static-ingress")["AccessKey"]
    print(key["AccessKeyId"], key["SecretAccessKey"])


if __name__ == "__main__":
    main()
