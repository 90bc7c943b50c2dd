"""Shared by the benchmark scripts' Python parts (sys.path has scripts/)."""
import json


def bulk_users(post_bulk, count, prefix):
    """Creates `count` users named PREFIX0… through /Bulk, 1,000 per request;
    `post_bulk(body)` sends one BulkRequest and returns (status, bytes).
    Returns their ids in order."""
    users = []
    while len(users) < count:
        n = min(1000, count - len(users))
        ops = [{"method": "POST", "path": "/Users", "bulkId": f"b{k}",
                "data": {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": f"{prefix}{len(users) + k}"}}
               for k in range(n)]
        s, d = post_bulk({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": ops})
        assert s == 200, s
        users += [o["location"].rsplit("/", 1)[1] for o in json.loads(d)["Operations"]]
    return users
